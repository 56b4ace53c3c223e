//! Writing then reading gives back exactly what was written, for any dtype,
//! shape mix, shard limit and write order; unfinished writes leave nothing.

mod common;

use amalgam_checkpoint::{
    Checkpoint, CheckpointWriter, Dtype, ShardLayout, TensorSpec, WriteOptions,
};
use common::{finish, listing};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const DTYPES: &[Dtype] = &[
    Dtype::F32,
    Dtype::F16,
    Dtype::BF16,
    Dtype::F64,
    Dtype::I64,
    Dtype::I32,
    Dtype::U8,
    Dtype::BOOL,
    Dtype::F8_E4M3,
    Dtype::U16,
];

fn tensors() -> impl Strategy<Value = Vec<(TensorSpec, Vec<u8>)>> {
    let one =
        (0..DTYPES.len(), prop::collection::vec(0usize..6, 0..3)).prop_flat_map(|(d, shape)| {
            let dtype = DTYPES[d];
            let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            prop::collection::vec(any::<u8>(), len)
                .prop_map(move |bytes| (dtype, shape.clone(), bytes))
        });
    prop::collection::vec(one, 1..12).prop_map(|items| {
        items
            .into_iter()
            .enumerate()
            .map(|(i, (dtype, shape, bytes))| {
                (TensorSpec::new(format!("t{i}.weight"), dtype, shape), bytes)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: RngSeed::Fixed(20_261_126), ..ProptestConfig::default() })]

    #[test]
    fn write_then_read_is_bit_exact(
        items in tensors(),
        shard_bytes in 1u64..200,
        order_seed in any::<u64>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let specs: Vec<TensorSpec> = items.iter().map(|(s, _)| s.clone()).collect();
        // Random bytes: some are NaN patterns, written as given.
        let options = WriteOptions { max_shard_bytes: shard_bytes, allow_nonfinite: true, ..Default::default() };
        let writer = CheckpointWriter::create(&out, specs.clone(), &options).unwrap();
        // Write in a scrambled order: data goes to precomputed offsets.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| amalgam_checkpoint::stream_seed(order_seed, "", i as u64));
        for i in order {
            writer.write_bytes(&items[i].0.name, &items[i].1).unwrap();
        }
        finish(writer).unwrap();

        let read = Checkpoint::open(&out).unwrap();
        let layout = ShardLayout::plan(specs, shard_bytes);
        prop_assert_eq!(read.shard_names().len(), layout.shards.len());
        prop_assert_eq!(read.index_path().is_some(), layout.shards.len() > 1);
        // File order is plan order (empty tensors have no position of their own).
        let non_empty = |name: &&str| read.entry(name).unwrap().numel() > 0;
        let names: Vec<&str> = read.tensors().iter().map(|t| t.name.as_str()).filter(non_empty).collect();
        let expected: Vec<&str> = items.iter().map(|(s, _)| s.name.as_str()).filter(non_empty).collect();
        prop_assert_eq!(names, expected);
        prop_assert_eq!(read.tensors().len(), items.len());
        for (spec, bytes) in &items {
            let entry = read.entry(&spec.name).unwrap();
            prop_assert_eq!(entry.dtype, spec.dtype);
            prop_assert_eq!(&entry.shape, &spec.shape);
            prop_assert_eq!(read.read_bytes(entry).unwrap(), bytes.clone());
        }
        prop_assert_eq!(listing(tmp.path()), vec!["out".to_owned()]);
    }
}

#[test]
fn tch_tensors_round_trip_for_float_dtypes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let source =
        tch::Tensor::from_slice(&[1.5f32, -2.25, 3.0e-3, 65504.0, -0.0, 7.0]).reshape([2, 3]);
    let kinds = [
        tch::Kind::Float,
        tch::Kind::Half,
        tch::Kind::BFloat16,
        tch::Kind::Double,
    ];
    let specs: Vec<TensorSpec> = kinds
        .iter()
        .map(|&k| {
            let dtype = amalgam_checkpoint::dtype_from_kind(k).unwrap();
            TensorSpec::new(format!("{k:?}"), dtype, vec![2, 3])
        })
        .collect();
    let writer = CheckpointWriter::create(&out, specs, &WriteOptions::default()).unwrap();
    for k in kinds {
        writer
            .write_tensor(&format!("{k:?}"), &source.to_kind(k))
            .unwrap();
    }
    finish(writer).unwrap();
    let read = Checkpoint::open(&out).unwrap();
    for k in kinds {
        let back = read.tensor(&format!("{k:?}")).unwrap();
        assert_eq!(back.kind(), k);
        assert!(back.equal(&source.to_kind(k)), "{k:?}");
    }
}

#[test]
fn writer_rejects_wrong_sizes_unknown_names_and_double_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let spec = TensorSpec::new("w", Dtype::F32, vec![2]);
    let writer = CheckpointWriter::create(&out, vec![spec], &WriteOptions::default()).unwrap();
    let err = writer.write_bytes("w", &[0; 4]).unwrap_err().to_string();
    assert!(err.contains("tensor w: got 4 bytes, planned 8"), "{err}");
    let err = writer.write_bytes("v", &[0; 8]).unwrap_err().to_string();
    assert!(
        err.contains("tensor v is not in the planned output"),
        "{err}"
    );
    let wrong_kind = tch::Tensor::from_slice(&[1.0f64, 2.0]);
    let err = writer
        .write_tensor("w", &wrong_kind)
        .unwrap_err()
        .to_string();
    assert!(err.contains("planned F32 [2]"), "{err}");
    writer.write_bytes("w", &[0; 8]).unwrap();
    let err = writer.write_bytes("w", &[0; 8]).unwrap_err().to_string();
    assert!(err.contains("written twice"), "{err}");
}

#[test]
fn unfinished_or_incomplete_writes_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let specs = vec![
        TensorSpec::new("a", Dtype::F32, vec![2]),
        TensorSpec::new("b", Dtype::F32, vec![2]),
    ];
    let writer = CheckpointWriter::create(&out, specs.clone(), &WriteOptions::default()).unwrap();
    writer.write_bytes("a", &[0; 8]).unwrap();
    drop(writer);
    assert!(listing(tmp.path()).is_empty());

    let writer = CheckpointWriter::create(&out, specs, &WriteOptions::default()).unwrap();
    writer.write_bytes("a", &[0; 8]).unwrap();
    let err = finish(writer).unwrap_err().to_string();
    assert!(err.contains("tensor b was never written"), "{err}");
    assert!(listing(tmp.path()).is_empty());
}

#[test]
fn non_empty_output_is_refused_unless_forced_and_inputs_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let specs = vec![TensorSpec::new("a", Dtype::U8, vec![1])];

    let err = CheckpointWriter::create(&out, specs.clone(), &WriteOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            amalgam_checkpoint::Error::OutputOccupied {
                occupant: amalgam_checkpoint::Occupant::NonEmptyDirectory,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(listing(&out), vec!["keep.txt"]);

    let input = tmp.path().join("input");
    std::fs::create_dir(&input).unwrap();
    for target in [input.clone(), input.join("inner"), tmp.path().to_path_buf()] {
        let options = WriteOptions {
            force: true,
            inputs: vec![input.clone()],
            ..Default::default()
        };
        let err = CheckpointWriter::create(&target, specs.clone(), &options)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("refusing to write over input checkpoint"),
            "{err}"
        );
    }

    let options = WriteOptions {
        force: true,
        ..Default::default()
    };
    let writer = CheckpointWriter::create(&out, specs, &options).unwrap();
    writer.write_bytes("a", &[9]).unwrap();
    finish(writer).unwrap();
    assert_eq!(
        listing(&out),
        vec!["README.md", "config.json", "model.safetensors"]
    );
    assert_eq!(listing(tmp.path()), vec!["input", "out"]);
}

#[test]
fn config_dtype_follows_the_written_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let specs = vec![
        TensorSpec::new("big", Dtype::BF16, vec![8]),
        TensorSpec::new("small", Dtype::F32, vec![1]),
    ];
    let writer = CheckpointWriter::create(&out, specs, &WriteOptions::default()).unwrap();
    writer.write_bytes("big", &[0; 16]).unwrap();
    writer.write_bytes("small", &[0; 4]).unwrap();
    finish(writer).unwrap();
    let read = Checkpoint::open(&out).unwrap();
    assert_eq!(read.config().dtype(), Some("bfloat16"));
}
