#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| event_service::fuzzing::publish(data));
