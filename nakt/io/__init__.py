from nakt.io.images import Image, read_image, read_mask, write_label  # noqa: F401
