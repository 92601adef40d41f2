//! Query limits beyond async-graphql's own depth and complexity (the number of aliases and
//! of fields once fragments are spread), and a cache of parsed documents: clients send the
//! same few query texts again and again, and parsing is the largest part of a small
//! query's cost. The cache also remembers which documents passed the full validation, so
//! that later requests with such a document skip the rules that cannot fail again (see
//! [`Known`]).

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::parser::types::{
    BaseType, Directive, DocumentOperations, ExecutableDocument, Selection, SelectionSet,
};
use async_graphql::{Name, Pos, Positioned, Request, ServerError, ServerResult, Value, Variables};
use pcf_domain::ErrorCode;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Refuses, before anything runs, documents with more than `aliases` aliased fields or
/// that expand (fragments spread in place) to more than `fields` fields. The second guards
/// the validator itself: async-graphql expands every spread before it counts complexity,
/// so a few hundred bytes of nested fragments would otherwise take minutes.
///
/// Over HTTP it runs in the handler (`admit`), so that the schema HTTP requests run on has
/// no extensions: async-graphql then resolves each field directly rather than through the
/// extension chain. On websockets it runs as an extension of the schema.
#[derive(Clone)]
pub struct DocumentLimits(Arc<AliasLimitExtension>);

impl DocumentLimits {
    pub fn new(aliases: usize, fields: usize) -> Self {
        Self(Arc::new(AliasLimitExtension {
            aliases,
            fields,
            cache: DocumentCache::new(CACHED_DOCUMENTS),
        }))
    }

    /// Hands `request` its parsed document, or refuses it for being over the limits. A
    /// document that does not parse is handed on as it is, for the schema to report with
    /// its position. With a cached document comes what is known of it: whether a request
    /// with it may skip the validation rules that cannot fail again.
    pub fn admit(&self, request: Request) -> Result<(Request, Option<Arc<Known>>), ServerError> {
        self.0.admit(request)
    }
}

/// A base type whose validity for a variable's value depends only on the value's JSON
/// kind, as async-graphql's validator checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Id,
    String,
    Boolean,
    Int,
}

/// A declared variable of a cached document.
#[derive(Debug)]
struct Declared {
    name: Name,
    kind: Kind,
    nullable: bool,
    defaulted: bool,
}

/// What is known of a cached document beyond its parse.
///
/// async-graphql validates every request in full (22 rules), and on a small query that is
/// a tenth of the process's work. Of those rules, only one looks at the variables' values
/// (that each argument's value fits its type); the others see the document alone, so once
/// a document has passed them it passes them again. A request with a document that passed
/// the full validation may therefore run with async-graphql's fast validation (the
/// complexity, depth and fragment-cycle checks, which it keeps) when its variables' values
/// certainly fit: every declared variable is an `ID`, `String`, `Boolean` or `Int` (nullable
/// or not, not a list), and each value is of a kind that type accepts (for `Int`, a whole
/// number from 0 up). Any other request (a list or enum or input object or custom scalar
/// variable, a value of the wrong kind, an explicit `null`, a missing required variable, a
/// request naming an operation the document does not have) runs the full validation, so
/// what a client is told about a bad request does not change.
#[derive(Debug)]
pub struct Known {
    /// The single operation's name, and its variables when all are of the kinds above;
    /// `None` when the document cannot take the fast path.
    operation: Option<(Option<Name>, Vec<Declared>)>,
    validated: AtomicBool,
    /// The metrics label of each of the document's operations, by name.
    labels: Vec<(Option<String>, &'static str)>,
}

impl Known {
    fn new(doc: &ExecutableDocument) -> Self {
        Self {
            operation: fast_operation(doc),
            validated: AtomicBool::new(false),
            labels: super::metrics::operation::of_document(doc),
        }
    }

    /// The metrics label of the operation a request with this document runs
    /// (`operation_name` is the one it asks for).
    pub fn label(&self, operation_name: Option<&str>) -> &'static str {
        super::metrics::operation::pick(&self.labels, operation_name)
    }

    /// Records that a request with this document passed the full validation.
    pub fn validated(&self) {
        if self.operation.is_some() {
            self.validated.store(true, Ordering::Relaxed);
        }
    }

    /// Whether `request` (with this document) can run with the fast validation.
    pub fn fast(&self, request: &Request) -> bool {
        let Some((name, declared)) = &self.operation else {
            return false;
        };
        if !self.validated.load(Ordering::Relaxed) {
            return false;
        }
        let operation_fits = match (&request.operation_name, name) {
            (None, _) => true,
            (Some(asked), Some(name)) => asked.as_str() == name.as_str(),
            (Some(_), None) => false,
        };
        operation_fits && declared.iter().all(|d| fits(d, &request.variables))
    }
}

/// The document's only operation, if its variables are all of the simple kinds.
fn fast_operation(doc: &ExecutableDocument) -> Option<(Option<Name>, Vec<Declared>)> {
    let (name, operation) = match &doc.operations {
        DocumentOperations::Single(op) => (None, op),
        DocumentOperations::Multiple(ops) if ops.len() == 1 => {
            let (name, op) = ops.iter().next()?;
            (Some(name.clone()), op)
        }
        DocumentOperations::Multiple(_) => return None,
    };
    let mut declared = Vec::new();
    for def in &operation.node.variable_definitions {
        let ty = &def.node.var_type.node;
        let BaseType::Named(base) = &ty.base else {
            return None;
        };
        let kind = match base.as_str() {
            "ID" => Kind::Id,
            "String" => Kind::String,
            "Boolean" => Kind::Boolean,
            "Int" => Kind::Int,
            _ => return None,
        };
        declared.push(Declared {
            name: def.node.name.node.clone(),
            kind,
            nullable: ty.nullable,
            defaulted: def.node.default_value.is_some(),
        });
    }
    Some((name, declared))
}

/// Whether the request's value for a declared variable certainly fits its type.
fn fits(declared: &Declared, variables: &Variables) -> bool {
    match variables.get(&declared.name) {
        None => declared.nullable || declared.defaulted,
        // A nullable variable may stand where a non-null argument has a default; the full
        // validation refuses a null there, which the executor would only report as a
        // field error.
        Some(Value::Null) => false,
        Some(Value::String(_)) => matches!(declared.kind, Kind::Id | Kind::String),
        // `Int` is registered by whichever integer type comes first, checking either
        // `is_i64` or `is_u64`: a number that passes both passes either.
        Some(Value::Number(n)) => match declared.kind {
            Kind::Id => n.is_i64(),
            Kind::Int => n.is_i64() && n.is_u64(),
            Kind::String | Kind::Boolean => false,
        },
        Some(Value::Boolean(_)) => declared.kind == Kind::Boolean,
        Some(_) => false,
    }
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        self.0.clone()
    }
}

struct AliasLimitExtension {
    aliases: usize,
    fields: usize,
    cache: DocumentCache,
}

/// How many parsed documents are kept.
const CACHED_DOCUMENTS: usize = 1024;
/// Longer query texts are parsed every time rather than kept.
const MAX_CACHED_TEXT: usize = 16 * 1024;

/// Parsed documents that passed the limits, by query text. Bounded: when full, the half
/// least recently used is dropped.
pub struct DocumentCache {
    capacity: usize,
    entries: Mutex<HashMap<String, Entry>>,
    clock: AtomicU64,
}

impl DocumentCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
        }
    }

    fn get(&self, text: &str) -> Option<(ExecutableDocument, Arc<Known>)> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get_mut(text)?;
        entry.used = tick;
        Some((entry.doc.clone(), entry.known.clone()))
    }

    /// Keeps `doc` for `text`; returns what will be known of it, when it is kept.
    fn put(&self, text: &str, doc: &ExecutableDocument) -> Option<Arc<Known>> {
        if text.len() > MAX_CACHED_TEXT || self.capacity == 0 {
            return None;
        }
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            let mut ticks: Vec<u64> = entries.values().map(|e| e.used).collect();
            let older_half = (ticks.len() - 1) / 2;
            let (_, cut, _) = ticks.select_nth_unstable(older_half);
            let cut = *cut;
            entries.retain(|_, e| e.used > cut);
        }
        let known = Arc::new(Known::new(doc));
        entries.insert(
            text.to_owned(),
            Entry {
                doc: doc.clone(),
                used: tick,
                known: known.clone(),
            },
        );
        Some(known)
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Entry {
    doc: ExecutableDocument,
    /// The clock's value when last used.
    used: u64,
    known: Arc<Known>,
}

/// How many fields a selection set stands for once fragments are spread, saturating;
/// `None` for a fragment cycle.
fn expanded(
    set: &SelectionSet,
    doc: &ExecutableDocument,
    memo: &mut HashMap<String, Option<u64>>,
    visiting: &mut HashSet<String>,
) -> Option<u64> {
    let mut total: u64 = 0;
    for item in &set.items {
        let n = match &item.node {
            Selection::Field(f) => {
                1u64.saturating_add(expanded(&f.node.selection_set.node, doc, memo, visiting)?)
            }
            Selection::InlineFragment(f) => {
                expanded(&f.node.selection_set.node, doc, memo, visiting)?
            }
            Selection::FragmentSpread(spread) => {
                let name = spread.node.fragment_name.node.to_string();
                if let Some(known) = memo.get(&name) {
                    (*known)?
                } else {
                    if !visiting.insert(name.clone()) {
                        return None;
                    }
                    let n = match doc.fragments.get(spread.node.fragment_name.node.as_str()) {
                        Some(f) => expanded(&f.node.selection_set.node, doc, memo, visiting),
                        // An unknown fragment is the validator's to report.
                        None => Some(0),
                    };
                    visiting.remove(&name);
                    memo.insert(name, n);
                    n?
                }
            }
        };
        total = total.saturating_add(n);
    }
    Some(total)
}

/// The fields of the document's largest operation, fragments spread; `None` on a cycle.
pub fn expanded_fields(doc: &ExecutableDocument) -> Option<u64> {
    let mut memo = HashMap::new();
    let mut visiting = HashSet::new();
    let mut sets = Vec::new();
    match &doc.operations {
        DocumentOperations::Single(op) => sets.push(&op.node.selection_set.node),
        DocumentOperations::Multiple(ops) => {
            sets.extend(ops.values().map(|op| &op.node.selection_set.node))
        }
    }
    let mut largest = 0;
    for set in sets {
        largest = largest.max(expanded(set, doc, &mut memo, &mut visiting)?);
    }
    Some(largest)
}

fn aliases(set: &SelectionSet) -> usize {
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(f) => {
                usize::from(f.node.alias.is_some()) + aliases(&f.node.selection_set.node)
            }
            Selection::InlineFragment(f) => aliases(&f.node.selection_set.node),
            Selection::FragmentSpread(_) => 0,
        })
        .sum()
}

/// Every alias written in the document (operations and fragments).
pub fn count_aliases(doc: &ExecutableDocument) -> usize {
    let operations: usize = match &doc.operations {
        DocumentOperations::Single(op) => aliases(&op.node.selection_set.node),
        DocumentOperations::Multiple(ops) => ops
            .values()
            .map(|op| aliases(&op.node.selection_set.node))
            .sum(),
    };
    let fragments: usize = doc
        .fragments
        .values()
        .map(|f| aliases(&f.node.selection_set.node))
        .sum();
    operations + fragments
}

/// The first directive written twice at one location, with where; `None` when there is
/// none. Every directive PCF's schema has for executable documents (`@include`, `@skip`)
/// is non-repeatable, and async-graphql does not check this rule of the specification
/// ("Directives Are Unique Per Location"): `@include(if: true) @include(if: false)` would
/// otherwise run with one of the two silently ignored.
pub fn repeated_directive(doc: &ExecutableDocument) -> Option<(Name, Pos)> {
    fn repeated(directives: &[Positioned<Directive>]) -> Option<(Name, Pos)> {
        directives.iter().enumerate().find_map(|(i, d)| {
            directives[..i]
                .iter()
                .any(|e| e.node.name.node == d.node.name.node)
                .then(|| (d.node.name.node.clone(), d.pos))
        })
    }
    fn in_set(set: &SelectionSet) -> Option<(Name, Pos)> {
        set.items.iter().find_map(|item| match &item.node {
            Selection::Field(f) => {
                repeated(&f.node.directives).or_else(|| in_set(&f.node.selection_set.node))
            }
            Selection::InlineFragment(f) => {
                repeated(&f.node.directives).or_else(|| in_set(&f.node.selection_set.node))
            }
            Selection::FragmentSpread(f) => repeated(&f.node.directives),
        })
    }
    let operations: Vec<_> = match &doc.operations {
        DocumentOperations::Single(op) => vec![op],
        DocumentOperations::Multiple(ops) => ops.values().collect(),
    };
    operations
        .into_iter()
        .find_map(|op| {
            repeated(&op.node.directives)
                .or_else(|| {
                    op.node
                        .variable_definitions
                        .iter()
                        .find_map(|v| repeated(&v.node.directives))
                })
                .or_else(|| in_set(&op.node.selection_set.node))
        })
        .or_else(|| {
            doc.fragments.values().find_map(|f| {
                repeated(&f.node.directives).or_else(|| in_set(&f.node.selection_set.node))
            })
        })
}

impl AliasLimitExtension {
    fn admit(&self, mut request: Request) -> Result<(Request, Option<Arc<Known>>), ServerError> {
        if let Some((doc, known)) = self.cache.get(&request.query) {
            request.set_parsed_query(doc);
            return Ok((request, Some(known)));
        }
        let query = request.query.clone();
        let mut known = None;
        if let Ok(doc) = request.parsed_query() {
            if let Some(error) = self.refuse(doc) {
                return Err(error);
            }
            known = self.cache.put(&query, doc);
        }
        Ok((request, known))
    }

    /// The error for a document over the limits, if it is, with its `extensions.code`.
    fn refuse(&self, doc: &ExecutableDocument) -> Option<ServerError> {
        if let Some((name, pos)) = repeated_directive(doc) {
            return Some(pcf_adapters::errors::server_error(
                ErrorCode::BadRequest,
                format!("The directive \"@{name}\" can only be used once at this location."),
                Some(pos),
            ));
        }
        let n = count_aliases(doc);
        if n > self.aliases {
            return Some(pcf_adapters::errors::server_error(
                ErrorCode::QueryTooComplex,
                format!("Query has too many aliases ({n}; at most {})", self.aliases),
                None,
            ));
        }
        // A cycle (`None`) is the validator's to report; it does not expand one.
        let fields = expanded_fields(doc).filter(|f| *f > self.fields as u64)?;
        Some(pcf_adapters::errors::server_error(
            ErrorCode::QueryTooComplex,
            format!(
                "Query is too complex: {fields} fields once fragments are spread (at most {})",
                self.fields
            ),
            None,
        ))
    }
}

#[async_trait::async_trait]
impl Extension for AliasLimitExtension {
    /// Runs before async-graphql's own checks, some of which (the recursion depth check)
    /// already spread fragments: the document is parsed here once (or taken from the
    /// cache, where only documents within the limits are kept) and handed on.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        next.run(ctx, self.admit(request)?.0).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directive_repeated_at_one_location_is_found_wherever_it_is() {
        let found = |q: &str| {
            let doc = async_graphql::parser::parse_query(q).unwrap();
            repeated_directive(&doc).map(|(name, _)| name.to_string())
        };
        assert_eq!(
            found("{ __typename @include(if: true) @include(if: false) }").as_deref(),
            Some("include")
        );
        assert_eq!(
            found("{ user(id: 1) { ... on User @skip(if: false) @skip(if: true) { id } } }")
                .as_deref(),
            Some("skip")
        );
        assert_eq!(
            found(
                "{ ...F @include(if: true) @include(if: true) } fragment F on Query { __typename }"
            )
            .as_deref(),
            Some("include")
        );
        assert_eq!(
            found("query { ...F } fragment F on Query { a: __typename @skip(if: true) @skip(if: true) }")
                .as_deref(),
            Some("skip")
        );
        // Different directives, or the same one at different locations, are fine.
        assert_eq!(
            found("{ __typename @include(if: true) @skip(if: false) }"),
            None
        );
        assert_eq!(
            found("{ user(id: 1) @include(if: true) { id @include(if: true) } }"),
            None
        );
    }

    #[test]
    fn aliases_in_fields_fragments_and_nesting_are_counted() {
        let doc = async_graphql::parser::parse_query(
            "query { a: user(id: 1) { b: email } ...F } fragment F on Query { c: user(id: 2) { id } }",
        )
        .unwrap();
        assert_eq!(count_aliases(&doc), 3);
    }

    #[test]
    fn nested_fragments_are_counted_expanded_without_expanding_them() {
        let mut q = String::from("query { ...F0 }");
        // F(i) spreads F(i+1) ten times: 10^8 fields at the bottom.
        for i in 0..8 {
            let spreads = (0..10)
                .map(|_| format!("...F{}", i + 1))
                .collect::<Vec<_>>()
                .join(" ");
            q.push_str(&format!(
                " fragment F{i} on Query {{ __typename {spreads} }}"
            ));
        }
        q.push_str(" fragment F8 on Query { __typename }");
        let doc = async_graphql::parser::parse_query(&q).unwrap();
        let started = std::time::Instant::now();
        let n = expanded_fields(&doc).unwrap();
        assert!(n > 100_000_000, "{n}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn the_cache_keeps_the_recently_used_half_when_full() {
        let cache = DocumentCache::new(4);
        let doc = async_graphql::parser::parse_query("{ a }").unwrap();
        for q in ["q0", "q1", "q2", "q3"] {
            cache.put(q, &doc);
        }
        // q0 and q1 are used again; q2 and q3 are the least recently used.
        assert!(cache.get("q0").is_some());
        assert!(cache.get("q1").is_some());
        cache.put("q4", &doc);
        assert!(cache.len() <= 4);
        assert!(cache.get("q0").is_some() && cache.get("q1").is_some());
        assert!(cache.get("q4").is_some());
        assert!(cache.get("q2").is_none() && cache.get("q3").is_none());
    }

    fn request(query: &str, variables: serde_json::Value) -> Request {
        Request::new(query).variables(Variables::from_json(variables))
    }

    fn known(query: &str) -> Known {
        Known::new(&async_graphql::parser::parse_query(query).unwrap())
    }

    const USER: &str = "query($id: ID!, $v: Int, $on: Boolean = true, $s: String) { a }";

    #[test]
    fn only_a_document_that_passed_the_full_validation_skips_it() {
        let k = known(USER);
        let r = request(USER, serde_json::json!({ "id": "x" }));
        assert!(!k.fast(&r));
        k.validated();
        assert!(k.fast(&r));
    }

    #[test]
    fn variables_of_a_kind_their_type_accepts_take_the_fast_path() {
        let k = known(USER);
        k.validated();
        for variables in [
            serde_json::json!({ "id": "x" }),
            serde_json::json!({ "id": 7, "v": 3, "on": false, "s": "y" }),
            serde_json::json!({ "id": "x", "unknown": [1, 2] }),
        ] {
            assert!(k.fast(&request(USER, variables.clone())), "{variables}");
        }
    }

    #[test]
    fn variables_that_might_not_fit_run_the_full_validation() {
        let k = known(USER);
        k.validated();
        for variables in [
            serde_json::json!({}),
            serde_json::json!({ "id": null }),
            serde_json::json!({ "id": "x", "v": null }),
            serde_json::json!({ "id": "x", "on": null }),
            serde_json::json!({ "id": "x", "s": null }),
            serde_json::json!({ "id": true }),
            serde_json::json!({ "id": 1.5 }),
            serde_json::json!({ "id": ["x"] }),
            serde_json::json!({ "id": { "a": 1 } }),
            serde_json::json!({ "id": "x", "v": -1 }),
            serde_json::json!({ "id": "x", "v": "3" }),
            serde_json::json!({ "id": "x", "on": "yes" }),
            serde_json::json!({ "id": "x", "s": 5 }),
        ] {
            assert!(!k.fast(&request(USER, variables.clone())), "{variables}");
        }
    }

    #[test]
    fn documents_with_other_variables_or_operations_never_skip_it() {
        for query in [
            "query($ids: [ID!]!) { a }",
            "query($f: UserFilter) { a }",
            "query($t: DateTime) { a }",
            "query A { a } query B { b }",
        ] {
            let k = known(query);
            k.validated();
            assert!(!k.fast(&request(query, serde_json::json!({}))), "{query}");
        }
    }

    #[test]
    fn a_request_must_name_the_operation_the_document_has() {
        let query = "query Named($id: ID!) { a }";
        let k = known(query);
        k.validated();
        let vars = serde_json::json!({ "id": "x" });
        assert!(k.fast(&request(query, vars.clone())));
        assert!(k.fast(&request(query, vars.clone()).operation_name("Named")));
        assert!(!k.fast(&request(query, vars.clone()).operation_name("Other")));
        let anonymous = known("query($id: ID!) { a }");
        anonymous.validated();
        assert!(!anonymous.fast(&request(query, vars).operation_name("Named")));
    }

    #[test]
    fn a_fragment_cycle_is_left_to_the_validator() {
        let doc = async_graphql::parser::parse_query(
            "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }",
        )
        .unwrap();
        assert_eq!(expanded_fields(&doc), None);
    }
}
