//! Arbitrary bytes, split at an arbitrary point, into the wire decoder: it must never panic nor
//! allocate much more than it was fed (run with -malloc_limit_mb), and every message it accepts
//! must encode again and decode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem::codec::{decode_frame, encode, Decoder, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let split = (split as usize * data.len() / 255).min(data.len());
    let mut d = Decoder::new();
    let mut msgs = Vec::new();
    for piece in [&data[..split], &data[split..]] {
        d.feed(piece);
        loop {
            match d.next() {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => {
                    // Errors are final, and printable.
                    let _ = e.to_string();
                    assert_eq!(d.next(), Err(e));
                    break;
                }
            }
        }
    }
    for m in msgs {
        let mut buf = Vec::new();
        encode(&m, &mut buf).expect("a decoded message encodes again");
        let (again, n) = decode_frame(&buf, MAX_FRAME)
            .expect("a re-encoded message decodes")
            .expect("and is complete");
        assert_eq!(n, buf.len());
        assert_eq!(again, m);
    }
});
