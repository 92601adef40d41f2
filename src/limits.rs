//! Query limits beyond async-graphql's own depth and complexity (the number of aliases and
//! of fields once fragments are spread), and a cache of parsed documents: clients send the
//! same few query texts again and again, and parsing is the largest part of a small
//! query's cost.

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Selection, SelectionSet,
};
use async_graphql::{Request, ServerError, ServerResult};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// its position.
    pub fn admit(&self, request: Request) -> Result<Request, ServerError> {
        self.0.admit(request)
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
    entries: Mutex<HashMap<String, (ExecutableDocument, u64)>>,
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

    fn get(&self, text: &str) -> Option<ExecutableDocument> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (doc, used) = entries.get_mut(text)?;
        *used = tick;
        Some(doc.clone())
    }

    fn put(&self, text: &str, doc: &ExecutableDocument) {
        if text.len() > MAX_CACHED_TEXT || self.capacity == 0 {
            return;
        }
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            let mut ticks: Vec<u64> = entries.values().map(|(_, t)| *t).collect();
            let older_half = (ticks.len() - 1) / 2;
            let (_, cut, _) = ticks.select_nth_unstable(older_half);
            let cut = *cut;
            entries.retain(|_, (_, t)| *t > cut);
        }
        entries.insert(text.to_owned(), (doc.clone(), tick));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

impl AliasLimitExtension {
    fn admit(&self, mut request: Request) -> Result<Request, ServerError> {
        if let Some(doc) = self.cache.get(&request.query) {
            request.set_parsed_query(doc);
            return Ok(request);
        }
        let query = request.query.clone();
        if let Ok(doc) = request.parsed_query() {
            if let Some(error) = self.refuse(doc) {
                return Err(error);
            }
            self.cache.put(&query, doc);
        }
        Ok(request)
    }

    /// The error for a document over the limits, if it is.
    fn refuse(&self, doc: &ExecutableDocument) -> Option<ServerError> {
        let n = count_aliases(doc);
        if n > self.aliases {
            return Some(ServerError::new(
                format!("Query has too many aliases ({n}; at most {})", self.aliases),
                None,
            ));
        }
        // A cycle (`None`) is the validator's to report; it does not expand one.
        let fields = expanded_fields(doc).filter(|f| *f > self.fields as u64)?;
        Some(ServerError::new(
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
        next.run(ctx, self.admit(request)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_fragment_cycle_is_left_to_the_validator() {
        let doc = async_graphql::parser::parse_query(
            "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }",
        )
        .unwrap();
        assert_eq!(expanded_fields(&doc), None);
    }
}
