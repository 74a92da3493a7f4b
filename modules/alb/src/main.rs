//! `alb --config FILE`: the ALB module (see `docs/alb.md`).

use std::process::ExitCode;
use std::sync::Arc;

use alb::alb::{Alb, AlbModule};
use alb::config::AlbConfig;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    shared_types::allocator::keep_freed_memory();
    switchyard_sdk::main("alb", |section| {
        let config = AlbConfig::from_section(section)?;
        Ok(AlbModule(Arc::new(Alb::new(config)?)))
    })
}
