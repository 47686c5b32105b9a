//! Legacy PC devices: the 8250 UART and the i8042 controller (used only for reset).

mod i8042;
mod serial;

pub use i8042::{ResetHandler, I8042};
pub use serial::{Serial, SerialMetrics};
