// Rebuild when a migration is added, not only when an embedded one changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
