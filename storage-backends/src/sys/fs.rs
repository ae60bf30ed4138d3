//! File-system calls that std does not offer: reserving a file's blocks
//! (`fallocate`) and a file system's free space (`fstatvfs`).
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

/// Allocates bytes `offset..offset + len` of `file`, extending it, so that
/// writes into them later cannot fail for want of space.
pub fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = |_| io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(too_big)?;
    let len = libc::off_t::try_from(len).map_err(too_big)?;
    loop {
        // SAFETY: fallocate takes a descriptor, which `file` keeps open for
        // the call, and integers; it touches none of our memory.
        let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Bytes free for use on the file system that holds `file`.
pub fn available_bytes(file: &File) -> io::Result<u64> {
    let mut stats = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs writes one `statvfs` through the pointer, which points
    // to memory of that type that outlives the call; `file` keeps the
    // descriptor open.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), stats.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs returned 0, so it filled the struct.
    let stats = unsafe { stats.assume_init() };
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
