//! The `operation` label of GraphQL metrics: the root field an operation asks for, from a
//! fixed list of PCF's own (its queries, mutations and subscriptions), so that the label
//! has a bounded set of values whatever clients send. Anything else (introspection, several
//! root fields at once, a name PCF does not have) is `other`.

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection};

/// The label of every operation that is not one of [`OPERATIONS`].
pub const OTHER: &str = "other";

/// The root fields of PCF's schema: queries, mutations, then subscriptions (`events` is a
/// query and a subscription).
pub const OPERATIONS: [&str; 11] = [
    "user",
    "users",
    "userByEmail",
    "events",
    "projections",
    "createUser",
    "updateProfile",
    "changeEmail",
    "deleteAccount",
    "userChanged",
    OTHER,
];

/// The label for `name` as a root field: itself when PCF has it, else [`OTHER`].
pub fn label(name: &str) -> &'static str {
    OPERATIONS
        .iter()
        .find(|known| **known == name)
        .copied()
        .unwrap_or(OTHER)
}

/// The label of each operation of a document, by operation name (`None` for the one
/// operation of a document with a single anonymous one): its root field's label when it
/// selects exactly one root field, directly; else [`OTHER`].
pub fn of_document(doc: &ExecutableDocument) -> Vec<(Option<String>, &'static str)> {
    let root = |set: &async_graphql::parser::types::SelectionSet| -> &'static str {
        match set.items.as_slice() {
            [one] => match &one.node {
                Selection::Field(f) => label(f.node.name.node.as_str()),
                _ => OTHER,
            },
            _ => OTHER,
        }
    };
    match &doc.operations {
        DocumentOperations::Single(op) => vec![(None, root(&op.node.selection_set.node))],
        DocumentOperations::Multiple(ops) => ops
            .iter()
            .map(|(name, op)| (Some(name.to_string()), root(&op.node.selection_set.node)))
            .collect(),
    }
}

/// The label of the operation a request runs: the one named `asked`, or the only one.
pub fn pick(labels: &[(Option<String>, &'static str)], asked: Option<&str>) -> &'static str {
    match (labels, asked) {
        ([(_, only)], None) => only,
        (_, Some(asked)) => labels
            .iter()
            .find(|(name, _)| name.as_deref() == Some(asked))
            .map_or(OTHER, |(_, label)| label),
        _ => OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(query: &str) -> Vec<(Option<String>, &'static str)> {
        of_document(&async_graphql::parser::parse_query(query).expect("a document"))
    }

    #[test]
    fn an_operation_is_labelled_by_its_one_root_field_when_pcf_has_it() {
        assert_eq!(pick(&labels("{ user(id: 1) { id } }"), None), "user");
        assert_eq!(
            pick(
                &labels("mutation M { createUser(input: {}) { version } }"),
                None
            ),
            "createUser"
        );
        assert_eq!(
            pick(
                &labels(
                    "query A { users { edges { node { id } } } } query B { projections { name } }"
                ),
                Some("B")
            ),
            "projections"
        );
    }

    #[test]
    fn anything_else_is_other() {
        // Several root fields, introspection, an unknown field, a fragment at the root, an
        // operation name the document does not have, no name where one is needed.
        for (query, asked) in [
            ("{ user(id: 1) { id } projections { name } }", None),
            ("{ __schema { types { name } } }", None),
            ("{ secretAdminField }", None),
            ("{ ...F } fragment F on Query { user(id: 1) { id } }", None),
            ("query A { user(id: 1) { id } }", Some("B")),
            (
                "query A { user(id: 1) { id } } query B { users { pageInfo { hasNextPage } } }",
                None,
            ),
        ] {
            assert_eq!(pick(&labels(query), asked), OTHER, "{query}");
        }
    }

    #[test]
    fn the_list_is_the_schemas_root_fields() {
        let sdl = crate::http::schema::sdl();
        let mut in_schema = Vec::new();
        for root in ["type Query {", "type Mutation {", "type SubscriptionRoot {"] {
            let start = sdl
                .find(root)
                .unwrap_or_else(|| panic!("{root} in the SDL"));
            let body = &sdl[start + root.len()..];
            let body = &body[..body.find("\n}").expect("the type's end")];
            for line in body.lines().map(str::trim) {
                let name: String = line
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let is_field = !name.is_empty()
                    && line[name.len()..].starts_with(['(', ':'])
                    && !line.starts_with('"');
                if is_field && !in_schema.contains(&name) {
                    in_schema.push(name);
                }
            }
        }
        let mut listed: Vec<String> = OPERATIONS
            .iter()
            .filter(|o| **o != OTHER)
            .map(|o| o.to_string())
            .collect();
        listed.sort();
        in_schema.sort();
        assert_eq!(listed, in_schema);
    }
}
