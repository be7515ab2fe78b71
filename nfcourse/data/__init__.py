"""Data for the course: toy 2-D data, MNIST (IDX reader and downloader), digits, image
densities, and the logo.

One module per job, everything re-exported here (``from nfcourse.data import mnist``):

* :mod:`nfcourse.data.idx`: :func:`read_idx` / :func:`write_idx`;
* :mod:`nfcourse.data.mnist`: :func:`mnist`, :func:`download_mnist`, :func:`load_idx_pair`,
  :func:`load_idx_folder` (Fashion-MNIST too);
* :mod:`nfcourse.data.toy`: :func:`two_moons`, :class:`Standardization`,
  :func:`two_moons_log_prob`, :func:`entropy_two_moons`;
* :mod:`nfcourse.data.images`: :func:`digits`, :func:`lesson_images`,
  :func:`image_density` / :class:`ImageDensity`, :func:`logo_path`.

Note: here ``mnist`` is the function, which hides the submodule of the same name as an
attribute of this package. ``from nfcourse.data.mnist import find_mnist`` works; to reach
the module object use ``sys.modules["nfcourse.data.mnist"]``. The mirror list
:data:`MIRRORS` is shared with the submodule: pass ``mirrors=`` per call, or edit the list
in place (``MIRRORS[:] = [...]``).
"""

from nfcourse.data.idx import IDXError, read_idx, write_idx
from nfcourse.data.images import (
    ImageData,
    ImageDensity,
    digits,
    image_density,
    lesson_images,
    logo_path,
    resize_images,
)
from nfcourse.data.mnist import (
    MIRRORS,
    MNIST_FILES,
    MNIST_MD5,
    MNISTDownloadError,
    MNISTNotFoundError,
    download_mnist,
    find_idx_pair,
    find_idx_pairs,
    find_mnist,
    load_idx_folder,
    load_idx_pair,
    mnist,
)
from nfcourse.data.toy import (
    Standardization,
    entropy_two_moons,
    two_moons,
    two_moons_log_prob,
    two_moons_population_standardization,
)

__all__ = [
    "IDXError",
    "ImageData",
    "ImageDensity",
    "MIRRORS",
    "MNISTDownloadError",
    "MNISTNotFoundError",
    "MNIST_FILES",
    "MNIST_MD5",
    "Standardization",
    "digits",
    "download_mnist",
    "entropy_two_moons",
    "find_idx_pair",
    "find_idx_pairs",
    "find_mnist",
    "image_density",
    "lesson_images",
    "load_idx_folder",
    "load_idx_pair",
    "logo_path",
    "mnist",
    "read_idx",
    "resize_images",
    "two_moons",
    "two_moons_log_prob",
    "two_moons_population_standardization",
    "write_idx",
]
