"""IMatrixGatherer: llmcompressor's importance-matrix pass, for the imatrix_mse observer."""

from __future__ import annotations

from .base import Modifier


class IMatrixGatherer(Modifier):
    """Makes oneshot run the calibration data through the model so that schemes with the
    imatrix_mse observer get E[x^2] per input column of each layer they quantize (the
    quantizing modifiers gather it themselves while the layer-sequential pass runs; GPTQ reads
    it from its Hessian's diagonal). It quantizes nothing; targets / ignore are accepted as
    llmcompressor's IMatrixGatherer takes them."""

    requires_calibration = True
    collects_statistics = True
