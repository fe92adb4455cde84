pub mod apikey;
pub mod gc;
pub mod run;
pub mod shim;
