//! The program image: the constructor that turns an exec'd copy of the
//! program into a fork server, and the object that holds the task code.
//! See `backend/local/start.rs` for the design.

/// The environment variable that makes an exec'd copy of the program a fork
/// server; its value is `SOCKET_FD,WORDS_FD,CONFIG_FD`.
pub(crate) const SERVER_ENV: &str = "PROCPOOL_FORK_SERVER";

/// The argument list glibc passes to an `.init_array` entry.
pub(crate) type Constructor =
    extern "C" fn(libc::c_int, *const *const libc::c_char, *const *const libc::c_char);

/// The value of [`SERVER_ENV`] in `envp` (the environment a constructor
/// is given), if it is set. Allocates only when it is.
pub(crate) fn server_marker(envp: *const *const libc::c_char) -> Option<String> {
    if envp.is_null() {
        return None;
    }
    let key = SERVER_ENV.as_bytes();
    let mut i = 0;
    loop {
        // SAFETY: envp is the NULL-terminated array of NUL-terminated
        // strings that the C runtime passes to constructors; we stop at
        // the NULL entry.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            return None;
        }
        // SAFETY: entry is a NUL-terminated string of the environment.
        let bytes = unsafe { std::ffi::CStr::from_ptr(entry) }.to_bytes();
        if bytes.len() > key.len() && bytes.starts_with(key) && bytes[key.len()] == b'=' {
            return Some(String::from_utf8_lossy(&bytes[key.len() + 1..]).into_owned());
        }
        i += 1;
    }
}

const DT_INIT_ARRAY: isize = 25;
const DT_INIT_ARRAYSZ: isize = 27;

/// A loaded ELF object, as the dynamic loader describes it: its load
/// bias and its program headers.
struct Loaded<'a> {
    bias: usize,
    headers: &'a [libc::Elf64_Phdr],
}

/// Calls `visit` for each loaded object, the main program first, until it
/// returns true.
fn each_object(mut visit: impl FnMut(&Loaded<'_>) -> bool) {
    extern "C" fn callback(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for the duration of
        // the call, whose dlpi_phdr points at dlpi_phnum program headers;
        // data is the &mut dyn FnMut given below, alive across the call.
        let (info, visit) = unsafe {
            (
                &*info,
                &mut *data.cast::<&mut dyn FnMut(&Loaded<'_>) -> bool>(),
            )
        };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) }
        };
        let o = Loaded {
            bias: info.dlpi_addr as usize,
            headers,
        };
        libc::c_int::from(visit(&o))
    }
    let mut visit: &mut dyn FnMut(&Loaded<'_>) -> bool = &mut visit;
    // SAFETY: callback matches the type dl_iterate_phdr expects and only
    // reads what the loader passes; data points at `visit`, alive across
    // the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(callback),
            (&mut visit as *mut &mut dyn FnMut(&Loaded<'_>) -> bool).cast(),
        )
    };
}

/// The main executable's `.init_array` (from its dynamic section), or
/// `None` for an executable without one (a static, non-PIE program).
fn main_init_array() -> Option<&'static [usize]> {
    /// An entry of an ELF dynamic section (`Elf64_Dyn`).
    #[repr(C)]
    struct Dyn {
        d_tag: isize,
        d_val: usize,
    }
    let (mut array, mut bytes) = (0usize, 0usize);
    each_object(|o| {
        for ph in o.headers.iter().filter(|ph| ph.p_type == libc::PT_DYNAMIC) {
            let mut d = (o.bias + ph.p_vaddr as usize) as *const Dyn;
            // SAFETY: PT_DYNAMIC of a loaded object is its mapped dynamic
            // section, an array of Dyn (the native word size) ended by
            // DT_NULL.
            unsafe {
                while (*d).d_tag != 0 {
                    match (*d).d_tag {
                        DT_INIT_ARRAY => array = o.bias + (*d).d_val,
                        DT_INIT_ARRAYSZ => bytes = (*d).d_val,
                        _ => {}
                    }
                    d = d.add(1);
                }
            }
        }
        // The first object is the main program: stop there.
        true
    });
    if array == 0 || bytes == 0 {
        return None;
    }
    // SAFETY: DT_INIT_ARRAY/DT_INIT_ARRAYSZ describe an array of function
    // addresses in the main program's mapped, never-unmapped image.
    Some(unsafe { std::slice::from_raw_parts(array as *const usize, bytes / size_of::<usize>()) })
}

/// Runs the main executable's constructors that come after `me` (this
/// crate's own), as the C runtime would have once `me` returned.
pub(crate) fn run_later_constructors(
    me: Constructor,
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) {
    let Some(array) = main_init_array() else {
        return;
    };
    let me = me as usize;
    let Some(at) = array.iter().position(|&f| f == me) else {
        return;
    };
    for &f in &array[at + 1..] {
        if f == 0 || f == usize::MAX {
            continue;
        }
        // SAFETY: every other entry of .init_array is a constructor the C
        // runtime would call with exactly these arguments, once, before
        // main; it is called here instead, once, since the runtime's loop
        // never gets past this crate's entry in a server (the caller, `me`,
        // never returns).
        let c = unsafe { std::mem::transmute::<usize, Constructor>(f) };
        c(argc, argv, envp);
    }
}

/// A loaded ELF object: the address ranges of its `PT_LOAD` segments, and
/// whether it is the main program.
pub(crate) struct Object {
    pub(crate) ranges: Vec<(usize, usize)>,
    pub(crate) is_main: bool,
}

/// The loaded ELF object that contains `addr`.
pub(crate) fn object_of(addr: usize) -> Option<Object> {
    let mut index = 0;
    let mut found = None;
    each_object(|o| {
        let ranges: Vec<(usize, usize)> = o
            .headers
            .iter()
            .filter(|ph| ph.p_type == libc::PT_LOAD)
            .map(|ph| {
                let lo = o.bias + ph.p_vaddr as usize;
                (lo, lo + ph.p_memsz as usize)
            })
            .collect();
        let is_main = index == 0;
        index += 1;
        if ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&addr)) {
            found = Some(Object { ranges, is_main });
            return true;
        }
        false
    });
    found
}
