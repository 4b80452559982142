"""The trigger gallery: statistics with hand-computed answers, and the PNGs the command writes."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eigenguard.attacks import create_attack
from eigenguard.cli import main
from eigenguard.gallery import (GAP, LEFT, TOP, gallery_size, residual, trigger_stats,
                                write_gallery)


def planted(count=1):
    """Zeros, and the same with +10 on a 3×3 square."""
    clean = torch.zeros(count, 1, 28, 28, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned[:, :, 5:8, 5:8] += 10
    return clean, poisoned


def test_trigger_stats_of_a_planted_square():
    stats = trigger_stats(*planted())
    # 9 values change by 10/255 on the [0, 1] scale:
    #   L2 = sqrt(9 · (10/255)²) = 30/255 = 0.117647...
    #   MSE = 9 · (10/255)² / 784 = 900 / (65025 · 784) = 1.7654e-5
    #   PSNR = 10 · log10(1 / MSE) = 10 · log10(65025 · 784 / 900) = 10 · log10(56643.7)
    #        = 47.53 dB
    assert stats["linf"] == 10
    assert stats["l2"] == pytest.approx(30 / 255)
    assert stats["psnr"] == pytest.approx(10 * math.log10(65025 * 784 / 900))
    assert stats["psnr"] == pytest.approx(47.531, abs=1e-3)
    assert stats["changed"] == pytest.approx(9 / 784)
    assert (stats["n"], stats["n_unchanged"]) == (1, 0)


def test_trigger_stats_average_over_images_and_skip_unchanged_ones_in_the_psnr():
    clean, poisoned = planted(3)
    poisoned[2] = clean[2]  # the third image is left as it was
    poisoned[1, 0, 0, 0] = 255  # the second also gets one white pixel
    stats = trigger_stats(clean, poisoned)
    assert stats["linf"] == 255
    second_l2 = math.sqrt(9 * (10 / 255) ** 2 + 1)
    assert stats["l2"] == pytest.approx((30 / 255 + second_l2 + 0) / 3)
    second_psnr = 10 * math.log10(784 / (9 * (10 / 255) ** 2 + 1))
    assert stats["psnr"] == pytest.approx((10 * math.log10(65025 * 784 / 900) + second_psnr) / 2)
    assert stats["n_unchanged"] == 1
    same = trigger_stats(clean, clean)
    assert same["linf"] == 0 and same["l2"] == 0 and math.isinf(same["psnr"])
    with pytest.raises(ValueError, match="one shape"):
        trigger_stats(clean, poisoned[:2])


def test_the_residual_maps_the_95th_percentile_to_white_and_clips_the_rest():
    clean = torch.zeros(1, 1, 10, 10, dtype=torch.uint8)
    poisoned = clean.clone()
    poisoned.view(-1)[:100] = torch.arange(1, 101, dtype=torch.uint8)  # differences 1..100
    amplified, gain = residual(clean, poisoned)
    assert gain == pytest.approx(255 / 95.05)  # torch's linear-interpolated 0.95 quantile
    assert amplified.view(-1)[0] == round(255 / 95.05) and amplified.view(-1)[-1] == 255
    unchanged, gain = residual(clean, clean)
    assert gain == 1.0 and not unchanged.any()


def test_write_gallery_places_the_rows_pixel_for_pixel(tmp_path):
    images = torch.full((3, 1, 28, 28), 60, dtype=torch.uint8)
    path = write_gallery(create_attack("badnets"), images, tmp_path / "g.png", "badnets test")
    pixels = np.array(Image.open(path).convert("RGB"))
    assert pixels.shape == (gallery_size(3, 28, 28)[1], gallery_size(3, 28, 28)[0], 3)
    residual_row = TOP + 2 * (112 + GAP)  # rows of 28 × 4 = 112 px
    cell = pixels[residual_row:residual_row + 112, LEFT:LEFT + 112, 0]
    white = np.argwhere(cell == 255)
    # the 3×3 corner patch upscaled ×4: a 12×12 white square, the rest of the residual black
    assert white.min(0).tolist() == [100, 100] and white.max(0).tolist() == [111, 111]
    assert len(white) == 144 and (cell[:100] == 0).all()
    clean_row = pixels[TOP:TOP + 112, LEFT:LEFT + 112, 0]
    assert (clean_row == 60).all()


@pytest.mark.parametrize("attack", ["badnets", "blended"])
def test_the_command_writes_one_png_per_attack(tmp_path, synthetic_root, capsys, attack):
    out = tmp_path / "gallery"
    assert main(["gallery", "--attack", attack, "--data-root", str(synthetic_root),
                 "--out", str(out)]) == 0
    path = out / f"{attack}.png"
    with Image.open(path) as image:
        # 8 images upscaled ×4 with 4-px gaps, row labels on the left: 110 + 8·112 + 7·4 + 12
        # wide; title and stats (94), three rows (3·112 + 2·4) and the caption (44) high
        assert image.size == gallery_size(8, 28, 28) == (1046, 482)
        assert image.format == "PNG"
    printed = capsys.readouterr().out
    assert printed.startswith(f"{attack}: L∞ ") and "mean PSNR" in printed
    assert str(path) in printed
    assert list(out.iterdir()) == [path]


def test_the_command_fits_a_fitted_attack_and_shows_several(tmp_path, synthetic_root, capsys):
    out = tmp_path / "gallery"
    assert main(["gallery", "--attack", "wanet", "--attack", "badnets", "--count", "3",
                 "--data-root", str(synthetic_root), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["badnets.png", "wanet.png"]
    with Image.open(out / "wanet.png") as image:
        assert image.size == gallery_size(3, 28, 28) == (720, 482)  # the minimum width
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["wanet", "badnets"]


def test_a_variant_gets_its_settings_and_a_file_of_its_own(tmp_path, synthetic_root, capsys):
    out = tmp_path / "gallery"
    common = ["--count", "3", "--data-root", str(synthetic_root), "--out", str(out)]
    assert main(["gallery", "--attack", "wanet", "--set", "attack.s=1.0", *common]) == 0
    assert main(["gallery", "--attack", "wanet", *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["wanet-s1.0.png", "wanet.png"]
    stronger, default = capsys.readouterr().out.splitlines()
    # a warp twice as strong moves pixels further: a larger mean L2 change
    l2 = [float(line.split("mean L2 ")[1].split()[0]) for line in (stronger, default)]
    assert l2[0] > l2[1] > 0
    for bad in (["--attack", "wanet", "--attack", "badnets", "--set", "attack.s=1.0"],
                ["--attack", "wanet", "--set", "attack.nope=1"],
                ["--attack", "wanet", "--set", "attack.s=-1"]):
        assert main(["gallery", *bad, *common]) == 2
    assert "one --attack" in capsys.readouterr().err


def test_the_command_refuses_an_unknown_attack(tmp_path, synthetic_root, capsys):
    assert main(["gallery", "--attack", "nope", "--data-root", str(synthetic_root),
                 "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_long_title_keeps_its_kind_and_fit_and_says_that_it_was_cut(tmp_path):
    from eigenguard.attacks import create_attack
    from eigenguard.gallery import describe_attack
    attack = create_attack("lf")
    title = describe_attack("lf", attack, fitted_on=2000)
    assert title.startswith("lf — dirty label, fitted on 2,000 training images (seed 0): eps=51.0")
