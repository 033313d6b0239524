"""berth.image.squashfs.estimate_bytes: the SquashFS a pull will write, from the manifest alone."""

from berth.image import squashfs
from berth.oci import mediatypes


def test_every_compressor_has_its_share_and_lz4_counts_the_layers_declared_sizes():
    assert sorted(squashfs.SIZE_PER_LAYER_BYTE) == sorted(squashfs.COMPRESSIONS)
    layers = [(mediatypes.OCI_LAYER_GZIP, 1000), (mediatypes.OCI_LAYER_ZSTD, 300), (mediatypes.DOCKER_LAYER_GZIP, 700),
              ("", 100)]  # an empty media type (Docker schema 2 in the wild) is sniffed: compressed
    assert squashfs.estimate_bytes(layers, "lz4") == 2100
    assert squashfs.estimate_bytes(layers, "zstd") == squashfs.estimate_bytes(layers, "xz") == 1575
    assert squashfs.estimate_bytes([], "lz4") == 0


def test_a_plain_tar_layer_counts_a_quarter_as_it_compresses_in_the_squashfs():
    plain = [(mediatypes.OCI_LAYER, 4000), ("application/vnd.docker.image.rootfs.diff.tar", 400)]
    assert squashfs.estimate_bytes(plain, "lz4") == 1100
    assert squashfs.estimate_bytes(plain, "gzip") == 825
