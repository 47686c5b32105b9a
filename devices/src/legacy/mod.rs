//! Legacy PC devices: the 8250 UART and the i8042 controller (used only for reset).

mod i8042;
mod serial;

pub use i8042::{I8042, ResetHandler};
pub use serial::{Serial, SerialMetrics};
