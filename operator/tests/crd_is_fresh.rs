//! The committed `crds/eventrouter.io_eventrouters.yaml` must equal what `operator crd` prints.

#[test]
fn the_committed_crd_matches_the_generated_one() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/eventrouter.io_eventrouters.yaml");
    let committed =
        std::fs::read_to_string(&path).expect("crds/eventrouter.io_eventrouters.yaml is readable");
    let generated = operator::crd::crd_yaml().expect("the CRD serializes");
    assert!(
        committed == generated,
        "crds/eventrouter.io_eventrouters.yaml is stale: regenerate it with \
         `cargo run -p operator -- crd > crds/eventrouter.io_eventrouters.yaml`"
    );
}
