//! Arbitrary headers and body through `Binding::REDIS`: no panic; what
//! decodes encodes and decodes back to the same event, in this binding and
//! in structured mode.
#![no_main]

#[path = "common/binary.rs"]
mod binary;

use libfuzzer_sys::fuzz_target;
use watchtower::codec::Binding;

fuzz_target!(|input: binary::Input| binary::run(Binding::REDIS, input));
