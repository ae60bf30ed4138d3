//! Loads blocks from a running gateway layer by layer, as a prefill engine would.
//!
//!     cargo run -p client --example load_blocks -- 127.0.0.1:7400 default KEY [KEY...]

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{BlockLoad, Client, ClientOptions, Region};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [address, namespace, keys @ ..] = arguments.as_slice() else {
        return Err("usage: load_blocks ADDRESS NAMESPACE KEY [KEY...]".into());
    };
    let client = Client::connect(&[address.as_str()], ClientOptions::default())?;
    let geometry = client
        .namespace(namespace)
        .ok_or("the gateway does not serve that namespace")?;
    let block_bytes = geometry.block_bytes();
    let region = Arc::new(Region::allocate(keys.len().max(1) * block_bytes as usize));
    let id = client.register_region(Arc::clone(&region))?;
    let blocks = keys
        .iter()
        .enumerate()
        .map(|(slot, key)| {
            Ok(BlockLoad {
                key: key.parse()?,
                layers: 0..geometry.layers,
                dest_offset: slot as u64 * block_bytes,
            })
        })
        .collect::<Result<Vec<_>, block_layout::ParseBlockKeyError>>()?;
    let started = Instant::now();
    let load = client.load(namespace, id, &blocks, 0)?;
    for layer in 0..geometry.layers {
        load.wait_layer(layer, Duration::from_secs(30))?;
        println!("layer {layer} ready after {:?}", started.elapsed());
    }
    for (index, status) in load
        .wait(Duration::from_secs(30))?
        .blocks
        .iter()
        .enumerate()
    {
        println!("block {}: {status:?}", keys[index]);
    }
    Ok(())
}
