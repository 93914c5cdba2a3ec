//! ewii-ebpf — the kernel side of the Client's egress lock.
//!
//! The cgroup programs are written in C (`egress.bpf.c`, map ABI in `egress.h`) because eBPF in
//! Rust needs `rust-src`, which this toolchain does not ship. `build.rs` compiles them with
//! clang (`-g` for the BTF that describes the maps); [`object`] hands the ELF object to the
//! loader in `ewii` (feature `ebpf`).
//!
//! Programs: `ewii_connect4`, `ewii_connect6`, `ewii_sendmsg4`, `ewii_sendmsg6` (cgroup
//! socket-address hooks, EPERM on refusal) and `ewii_skb_egress` (cgroup_skb egress backstop).
//! Maps: `ALLOW4`, `ALLOW6` (hash sets of allowed destinations), `DENIES` (per-CPU counters by
//! hook), `EVENTS` (ring buffer of refused attempts), `LOST` (refusals the ring buffer had no
//! room for; each event carries the count so far).
#![forbid(unsafe_code)]

/// 8-byte alignment for the embedded ELF object (the loader parses it in place).
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static OBJECT: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/egress.bpf.o")));

/// The compiled cgroup programs (an ELF object with BTF).
pub fn object() -> &'static [u8] {
    &OBJECT.0
}

/// Program names in the object, with the hook each attaches to.
pub const PROGRAMS: [(&str, &str); 5] = [
    ("ewii_connect4", "cgroup/connect4"),
    ("ewii_connect6", "cgroup/connect6"),
    ("ewii_sendmsg4", "cgroup/sendmsg4"),
    ("ewii_sendmsg6", "cgroup/sendmsg6"),
    ("ewii_skb_egress", "cgroup_skb/egress"),
];

/// The map ABI header, for the layout test in `ewii-common`.
pub const HEADER: &str = include_str!("../egress.h");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_is_an_aligned_bpf_elf() {
        let obj = object();
        assert_eq!(&obj[..4], b"\x7fELF");
        assert_eq!(obj.as_ptr() as usize % 8, 0);
        // e_machine at offset 18: EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([obj[18], obj[19]]), 247);
    }
}
