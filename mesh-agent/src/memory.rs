//! Keeping the agent's resident memory close to what it uses.
//!
//! The agent allocates through mimalloc (see `main.rs`). Two of its defaults
//! cost an idle agent resident memory that it does not use. Measured on the
//! agent in release, idle, with a 6.18 kernel whose THP setting is `madvise`:
//!
//! - **Transparent huge pages.** mimalloc asks for huge pages on its arenas, so
//!   the first touch anywhere in a 2 MiB region makes all of it resident. An
//!   agent's heap is a few MiB spread over many such regions. In iptables mode
//!   huge pages cost 8 MiB of an idle agent's RSS (18.2 MiB with them, 9.9 MiB
//!   without). A heap this small gains nothing measurable from fewer TLB misses.
//! - **Freed memory returned late.** Loading the eBPF object parses the kernel's
//!   BTF, a burst of about 16 MiB that is freed at once. mimalloc hands freed
//!   pages back to the kernel only later, when the thread that freed them
//!   allocates again or exits. The blocking thread that loaded the programs does
//!   neither until the runtime retires it about 10 s later, so until then an
//!   eBPF-mode agent sat at 43.6 MiB. With both fixes it idles at 11.5 MiB.
//!
//! [`keep_small`] switches off huge pages for the process; [`return_freed`] is
//! called after such a burst.

/// Switches off transparent huge pages for this process: for its allocator and
/// everything else, and whether the kernel's setting is `always` or `madvise`.
/// The kernel checks the setting when a page is first touched, so it must come
/// before the heap's first pages: the agent binary calls it from a constructor
/// (see `main.rs`), and by `main` mimalloc has already touched its first 4 MiB.
/// The setting is inherited by the commands the agent runs (`iptables`), which
/// are short-lived and small.
///
/// Returns 0 or the `errno` of the failure. It allocates nothing, so it is safe
/// to run before the Rust runtime is up.
pub extern "C" fn keep_small() -> i32 {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Hands memory freed on the calling thread back to the kernel now, and purges
/// what the allocator still holds for delayed return. Call it on a thread that has
/// just freed a large burst and will then sit idle. Outside the agent binary,
/// which has another global allocator, it touches only mimalloc's own empty
/// state.
pub fn return_freed() {
    // SAFETY: mi_collect has no preconditions. `force` also purges the pages of
    // every arena that are waiting out the purge delay.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn keep_small_switches_huge_pages_off_for_the_process() {
        assert_eq!(super::keep_small(), 0);
        // SAFETY: integer arguments only.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1, "PR_GET_THP_DISABLE after keep_small");
    }
}
