"""One decode for training, evaluation and detection: the clean view of the same bytes is the same tensor everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import Sizes, jpeg, make_record, photo_crop, real_row
from torch import nn
from torch.utils.data import DataLoader

from codetrain.data import D3Records, collate
from codetrain.embed import embed_files, embed_shards
from codetrain.realsource import RealImageSource
from codetrain.views import ViewMaker
from d3builder.storage.schema import REAL_FEATURES, d3_features, elsa_features
from d3builder.storage.shards import image_cell, write_shard

RECORDS = 12
REAL_SIZE, FAKE_SIZE = (1024, 768), (256, 256)


class Pixels(nn.Module):
    """An 'embedder' that returns its input: embeddings are then the preprocessed tensors themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def write_records(root: Path, elsa_layout: bool) -> tuple[list[str], dict[str, bytes]]:
    """Records with a large JPEG real (1024x768 photo) and four small JPEG fakes (256x256), in our or the ELSA layout.

    In the ELSA layout the reals go to `root/real/00000.parquet` (a fetch-real shard). Returns the
    shard paths and every image's bytes keyed "{id}/real" or "{id}/{generator}".
    """
    rows, reals, images = [], [], {}
    for index in range(RECORDS):
        row = make_record(index, "train", 11, Sizes(real=(64, 64), fake=FAKE_SIZE))[0]
        real = jpeg(photo_crop(np.random.default_rng([11, index]), REAL_SIZE), quality=92)
        row["image_real"] = image_cell(real)
        images[f"{row['id']}/real"] = real
        for slot in range(4):
            name = row[f"model_gen{slot}"] if elsa_layout else row[f"generator_gen{slot}"]
            images[f"{row['id']}/{name}"] = row[f"image_gen{slot}"]["bytes"]
        reals.append(real_row(row["id"], row["url"], real))
        rows.append(row)
    features = elsa_features() if elsa_layout else d3_features()
    shard = write_shard(rows, root / "train" / "train-00000.parquet", features, row_group_size=4)
    if elsa_layout:
        write_shard(reals, root / "real" / "00000.parquet", REAL_FEATURES)
    return [str(shard)], images


@pytest.mark.parametrize("layout", ["ours", "elsa"])
def test_training_clean_views_equal_evaluation_and_detection_views_bit_for_bit(tmp_path: Path, layout: str) -> None:
    shards, images = write_records(tmp_path / "d3", elsa_layout=layout == "elsa")
    source = RealImageSource(str(tmp_path / "d3" / "real")) if layout == "elsa" else None

    evaluated = embed_shards(Pixels(), shards, batch_size=8, real_source=source)
    assert len(evaluated) == RECORDS * 5 and not evaluated.skipped
    by_image = {f"{rid}/{gen}": vector for rid, gen, vector in zip(evaluated.ids, evaluated.generators, evaluated.vectors, strict=True)}

    records = D3Records(shards, seed=3, shuffle_buffer=4, views=ViewMaker(), real_source=source, batch_size=4)
    trained = 0
    for batch in DataLoader(records, batch_size=4, collate_fn=collate):
        for i, rid in enumerate(batch["id"]):
            assert batch["x_r"][i].shape == (3, 224, 224)
            # the training views draw crops and augmentations for every record; the clean views stay exact
            assert np.array_equal(batch["x_r"][i].flatten().numpy(), by_image[f"{rid}/real"]), (rid, "real")
            assert np.array_equal(batch["x_f"][i].flatten().numpy(), by_image[f"{rid}/{batch['generator'][i]}"]), (rid, "fake")
            trained += 1
    assert trained == RECORDS

    folder = tmp_path / "files"
    folder.mkdir()
    files = []
    for key in (f"{evaluated.ids[0]}/real", f"{evaluated.ids[1]}/{evaluated.generators[1]}"):
        files.append(folder / f"{len(files)}.jpg")
        files[-1].write_bytes(images[key])
    failures: list = []
    detected = [v for _, batch in embed_files(Pixels(), files, failures, batch_size=2) for v in batch]
    assert not failures
    assert np.array_equal(detected[0], by_image[f"{evaluated.ids[0]}/real"])
    assert np.array_equal(detected[1], by_image[f"{evaluated.ids[1]}/{evaluated.generators[1]}"])
