//! The main-thread boundary: everything that calls Dovecot runs here, as a job on the main
//! thread ([`mainloop`]), through the safe wrapper over the C shim ([`dovecot`]).

#[cfg(feature = "service")]
pub mod dovecot;
pub mod mainloop;
#[cfg(feature = "service")]
pub mod users;
