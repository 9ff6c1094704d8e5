//! The main-thread boundary: everything that calls Dovecot runs here, as a job on the main
//! thread ([`mainloop`]), through the safe wrapper over the C shim ([`dovecot`]), as root or as
//! the user of the call ([`creds`]).

#[cfg(feature = "service")]
pub mod creds;
#[cfg(feature = "service")]
pub mod dovecot;
pub mod mainloop;
#[cfg(feature = "service")]
pub mod users;
