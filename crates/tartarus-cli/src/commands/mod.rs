pub mod gc;
pub mod run;
pub mod shim;
