//! Fuzz target `spec_gen`: fuzzer bytes as choices for a generated
//! `kiln.toml` (`kiln_fuzz::gen`), then the same checks as `spec`.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::generated(data));
