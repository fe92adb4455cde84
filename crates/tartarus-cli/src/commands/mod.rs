pub mod apikey;
pub mod gc;
pub mod remote;
pub mod run;
pub mod server;
pub mod shim;
