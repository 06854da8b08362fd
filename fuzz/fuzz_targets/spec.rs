//! The build spec parser: any text gives a spec or a one-line error naming the file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imgbuild::registry::fuzzing::spec(&String::from_utf8_lossy(data));
});
