//! Validation against the official CycloneDX 1.5 JSON schema (vendored in
//! this directory with the two schemas it refers to, Apache-2.0). Shared
//! by the kiln-image and kiln-cli tests through `#[path]`.

use std::path::Path;

/// Every schema violation of `bom` (empty when it is valid CycloneDX 1.5).
pub fn cyclonedx_1_5_errors(bom: &serde_json::Value) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-image/tests/schema");
    let load = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    let registry = jsonschema::Registry::new()
        .add(
            "http://cyclonedx.org/schema/spdx.schema.json",
            load("spdx.schema.json"),
        )
        .unwrap()
        .add(
            "http://cyclonedx.org/schema/jsf-0.82.schema.json",
            load("jsf-0.82.schema.json"),
        )
        .unwrap()
        .prepare()
        .unwrap();
    let schema = load("bom-1.5.schema.json");
    let validator = jsonschema::options()
        .with_registry(&registry)
        .build(&schema)
        .expect("the CycloneDX 1.5 schema compiles");
    validator
        .iter_errors(bom)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}
