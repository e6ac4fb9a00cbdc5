pub(crate) mod authorizer;
pub(crate) mod decision;
pub(crate) mod permission;
pub(crate) mod principal;
