pub mod gc;
pub mod run;
