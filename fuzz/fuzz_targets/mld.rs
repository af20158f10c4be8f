//! ICMPv6 messages and their control data, as any host on the link may send them: the MLD
//! parser and the control-message walk answer or refuse, never panic or loop.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lcfs::mld::parse::parse(data);
    let _ = lcfs::mld::envelope::parse_control(data);
});
