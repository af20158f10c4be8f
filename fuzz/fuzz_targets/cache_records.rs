//! What the cache reads back: its index records (from disk, which a crash or a hand may
//! have mangled) and the frames of its sharing protocol (from other processes on the
//! machine). A decode is a refusal or a value that encodes back to what was read.
#![no_main]
use lcfs_cache::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => fuzzing::index_entry(bytes),
        1 => fuzzing::shared_request(bytes),
        _ => fuzzing::shared_reply(bytes),
    }
});
