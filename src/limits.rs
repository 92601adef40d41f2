//! Query limits beyond async-graphql's own depth and complexity: the number of aliases.

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{
    DocumentOperations, ExecutableDocument, Selection, SelectionSet,
};
use async_graphql::{ServerError, ServerResult, Variables};
use std::sync::Arc;

/// Refuses documents with more than `max` aliased fields, before anything runs.
pub struct AliasLimit(pub usize);

impl ExtensionFactory for AliasLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(AliasLimitExtension(self.0))
    }
}

struct AliasLimitExtension(usize);

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
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let doc = next.run(ctx, query, variables).await?;
        let n = count_aliases(&doc);
        if n > self.0 {
            return Err(ServerError::new(
                format!("Query has too many aliases ({n}; at most {})", self.0),
                None,
            ));
        }
        Ok(doc)
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
}
