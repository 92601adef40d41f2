//! Rebuilds the crate when a migration is added or changed (`sqlx::migrate!` embeds them at
//! compile time, and cargo does not watch the folders by itself).
fn main() {
    println!("cargo:rerun-if-changed=postgres");
    println!("cargo:rerun-if-changed=sqlite");
}
