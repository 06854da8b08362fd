//! `WWW-Authenticate` parsing: one header, or the input split into two headers at a NUL.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text.split('\0').collect();
    imgbuild::registry::fuzzing::challenges(&values);
});
