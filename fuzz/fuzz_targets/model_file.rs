//! Any byte string given to the model-file parser yields a model or an error, never a panic, a hang or an
//! unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = patchcore::ModelFile::from_bytes(data, std::path::Path::new("fuzz.patchcore"));
});
