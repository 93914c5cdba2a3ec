//! Property tests of the frame decoder against arbitrary input (P5: the wire is ours alone to
//! parse, so hostile bytes must never panic it or make it allocate on a claim).
//!
//! A counting global allocator records the largest single allocation made while decoding.
#![allow(unsafe_code)] // the counting allocator below; nothing else in this file is unsafe
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use ewii_common::frame::{self, Control, Enrol, FrameError, QueryHead, MAX_FRAME};
use proptest::prelude::*;

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`; the thread-locals are const-initialised
// `Cell`s, so touching them never allocates or re-enters the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    f();
    TRACKING.with(|t| t.set(false));
    LARGEST.with(|l| l.get())
}

fn decode_all(bytes: &[u8]) {
    // Every message type, fed whole and in one-byte steps.
    let mut b = BytesMut::from(bytes);
    let _ = frame::decode::<Control>(&mut b);
    let mut b = BytesMut::from(bytes);
    let _ = frame::decode::<Enrol>(&mut b);
    let mut b = BytesMut::from(bytes);
    let _ = frame::decode::<QueryHead>(&mut b);
}

/// A frame header claiming `len` bytes, then `body`.
fn framed(len: u32, body: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn p5_decoding_arbitrary_bytes_never_panics_nor_overallocates(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let input = bytes.clone();
        let largest = largest_allocation(|| decode_all(&input));
        prop_assert!(largest <= MAX_FRAME, "allocated {largest} bytes");
    }

    #[test]
    fn p5_well_framed_garbage_bodies_never_panic_nor_overallocate(body in proptest::collection::vec(any::<u8>(), 1..2048)) {
        // A correct length and version, then garbage: this reaches the body decoder, where a
        // claimed list or byte-string length could otherwise drive an allocation.
        let mut b = body.clone();
        b[0] = frame::FORMAT_VERSION;
        let input = framed(b.len() as u32, &b);
        let largest = largest_allocation(|| decode_all(&input));
        prop_assert!(largest <= MAX_FRAME, "allocated {largest} bytes");
    }

    #[test]
    fn p5_split_points_do_not_change_the_result(cut in 0usize..64, destination in "[a-z]{1,20}") {
        let msg = QueryHead::Open { query_id: frame::QueryId(42), destination, source: "s".into() };
        let whole = frame::encode_to_vec(&msg).unwrap();
        let cut = cut.min(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        let first = frame::decode::<QueryHead>(&mut buf).unwrap();
        if cut < whole.len() {
            prop_assert_eq!(first, None);
            buf.extend_from_slice(&whole[cut..]);
            prop_assert_eq!(frame::decode::<QueryHead>(&mut buf).unwrap(), Some(msg));
        } else {
            prop_assert_eq!(first, Some(msg));
        }
    }
}

#[test]
fn p5_a_full_frame_of_tiny_list_elements_stays_within_the_maximum() {
    // Hello whose name list claims as many elements as there are bytes left (postcard trusts a
    // claim that small), each a one-byte empty string: without our own bound the list alone
    // would take 24 bytes per byte of frame.
    let n: usize = MAX_FRAME - 16;
    let mut body = vec![frame::FORMAT_VERSION, 0, 1];
    let mut v = n;
    while v >= 0x80 {
        body.push((v as u8) | 0x80);
        v >>= 7;
    }
    body.push(v as u8);
    body.resize(body.len() + n, 0);
    let input = framed(body.len() as u32, &body);
    let mut result = None;
    let largest = largest_allocation(|| {
        let mut b = BytesMut::from(&input[..]);
        result = Some(frame::decode::<Control>(&mut b));
    });
    assert_eq!(result, Some(Err(FrameError::Malformed)));
    assert!(largest <= MAX_FRAME, "allocated {largest} bytes");
}

#[test]
fn p5_claimed_huge_lists_allocate_nothing_on_the_claim() {
    // Body: version, variant 0 (Hello), version varint, then a list claiming u64::MAX/2 names.
    let body = [
        frame::FORMAT_VERSION,
        0,
        1,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0xff,
        0x7f,
    ];
    let input = framed(body.len() as u32, &body);
    let mut result = None;
    let largest = largest_allocation(|| {
        let mut b = BytesMut::from(&input[..]);
        result = Some(frame::decode::<Control>(&mut b));
    });
    assert_eq!(result, Some(Err(FrameError::Malformed)));
    assert!(largest < 1024, "allocated {largest} bytes on a claim");
    // A header claiming more than the maximum is refused before the body arrives.
    let mut b = BytesMut::from(&framed(u32::MAX, &[])[..]);
    assert_eq!(
        frame::decode::<Control>(&mut b),
        Err(FrameError::TooLarge(u32::MAX as usize))
    );
}
