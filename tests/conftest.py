"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run fastest single-threaded, and CI shares its two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def catalog():
    """Restore Detectron2's dataset and metadata catalogs after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    saved_d = dict(DatasetCatalog)
    saved_m = {name: MetadataCatalog.get(name) for name in MetadataCatalog.list()}
    yield
    DatasetCatalog.clear()
    DatasetCatalog.update(saved_d)
    MetadataCatalog.clear()
    MetadataCatalog.update(saved_m)
