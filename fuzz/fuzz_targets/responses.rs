//! What else a registry sends: error bodies, upload `Location`s, `Retry-After`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    use imgbuild::registry::fuzzing;
    fuzzing::error_body(data, false);
    fuzzing::error_body(data, true);
    let text = String::from_utf8_lossy(data);
    fuzzing::location(&text);
    fuzzing::retry_after(&text);
});
