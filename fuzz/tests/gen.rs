//! The generator writes TOML that parses, and enough of it loads with
//! servers for the planner to be exercised.

#[test]
fn generated_specs_are_toml_and_some_load() {
    let mut loaded = 0;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..500 {
        let bytes: Vec<u8> = (0..2048)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let mut u = arbitrary::Unstructured::new(&bytes);
        let text = kiln_fuzz::gen::kiln_toml(&mut u).unwrap();
        let value: Result<toml::Table, _> = text.parse();
        assert!(value.is_ok(), "{text}\n{value:?}");
        let project = kiln_spec::parse(
            &text,
            std::path::Path::new("kiln.toml"),
            kiln_fuzz::project_dir(),
        );
        if project.is_ok_and(|p| {
            p.envs
                .values()
                .any(|e| e.roles.values().any(|r| r.servers > 0))
        }) {
            loaded += 1;
        }
        kiln_fuzz::spec(&text);
    }
    eprintln!("{loaded} of 500 generated specs load with servers to plan");
    assert!(
        loaded > 50,
        "only {loaded} of 500 generated specs load with servers to plan"
    );
}
