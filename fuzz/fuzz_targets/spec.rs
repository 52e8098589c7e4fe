//! Fuzz target `spec`: any bytes as `kiln.toml`, through the spec loader
//! and, when they load, the planner. See `kiln_fuzz::spec` for what must
//! hold.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        kiln_fuzz::spec(text);
    }
});
