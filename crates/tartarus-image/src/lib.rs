//! OCI images for Tartarus: pulling from registries, a content-addressed layer store shared by all images,
//! safe unpacking of layer tarballs into overlay-ready directories, and template definitions.

pub mod pull;
pub mod reference;
pub mod runspec;
pub mod store;
pub mod template;
pub mod unpack;
