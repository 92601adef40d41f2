//! Query limits beyond async-graphql's own depth and complexity: the number of aliases.

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextPrepareRequest,
};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Selection, SelectionSet,
};
use async_graphql::{Request, ServerError, ServerResult};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Refuses, before anything runs, documents with more than `aliases` aliased fields or
/// that expand (fragments spread in place) to more than `fields` fields. The second guards
/// the validator itself: async-graphql expands every spread before it counts complexity,
/// so a few hundred bytes of nested fragments would otherwise take minutes.
pub struct DocumentLimits {
    pub aliases: usize,
    pub fields: usize,
}

impl ExtensionFactory for DocumentLimits {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(AliasLimitExtension {
            aliases: self.aliases,
            fields: self.fields,
        })
    }
}

struct AliasLimitExtension {
    aliases: usize,
    fields: usize,
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

#[async_trait::async_trait]
impl Extension for AliasLimitExtension {
    /// Runs before async-graphql's own checks, some of which (the recursion depth check)
    /// already spread fragments: the document is parsed here once and handed on.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // A syntax error is reported by the normal path, with its position.
        if let Ok(doc) = request.parsed_query() {
            let n = count_aliases(doc);
            if n > self.aliases {
                return Err(ServerError::new(
                    format!("Query has too many aliases ({n}; at most {})", self.aliases),
                    None,
                ));
            }
            if let Some(fields) = expanded_fields(doc).filter(|f| *f > self.fields as u64) {
                return Err(ServerError::new(
                    format!(
                        "Query is too complex: {fields} fields once fragments are spread (at most {})",
                        self.fields
                    ),
                    None,
                ));
            }
            // A cycle (`None`) is the validator's to report; it does not expand one.
        }
        next.run(ctx, request).await
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
    fn a_fragment_cycle_is_left_to_the_validator() {
        let doc = async_graphql::parser::parse_query(
            "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }",
        )
        .unwrap();
        assert_eq!(expanded_fields(&doc), None);
    }
}
