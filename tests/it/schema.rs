//! The checked-in SDL (`docs/schema.graphql`) is what `pcf schema` prints.

#[test]
fn checked_in_schema_matches_the_served_schema() {
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/schema.graphql"))
            .expect("docs/schema.graphql exists");
    let served = pcf::http::schema::sdl();
    assert!(
        checked_in == served,
        "docs/schema.graphql is out of date: run `cargo run -- schema > docs/schema.graphql`"
    );
}

#[test]
fn the_schema_has_the_contract_operations() {
    let sdl = pcf::http::schema::sdl();
    for needle in [
        "createUser(input: CreateUserInput!, commandId: ID): UserPayload!",
        "deleteAccount(id: ID!, expectedVersion: Int, commandId: ID): DeleteAccountPayload!",
        "user(id: ID!, minVersion: Int): User",
        "userByEmail(email: String!): User",
        "userChanged(id: ID!): User!",
    ] {
        assert!(sdl.contains(needle), "missing from the schema: {needle}");
    }
}
