"""MONAI Label app: SAMv2 point matching and CrossSAM CT-MR registration for 3D Slicer.

Start it with (see README.md here)::

    monailabel start_server --app apps/samv2_label --studies /data/scans

Infer tasks (logic in :mod:`samv2_components.serving.label_tasks`, configuration in the bundles):

* ``samv2_match``: the image is the query; params ``template_image`` (datastore id) and ``template_points``
  (3D Slicer markups) -> the matched points as Slicer markups.
* ``crosssam_register``: the image is the moving scan; params ``fixed_image`` (datastore id) -> the rigid
  transform (4x4 matrix in LPS mm and an ITK ``.tfm``) with its confidence summary.

Server options (``--conf key value``): ``bundles_dir`` (default: the bundles of this checkout), ``cache_dir``
(embedding cache, default: ``<studies>/.samv2_cache``), ``modality`` (default template modality, ``ct``).
"""

import logging
import os

from monailabel.interfaces.app import MONAILabelApp

from samv2_components.serving.label_tasks import MatchPointsTask, RegisterTask

logger = logging.getLogger(__name__)


class SAMv2LabelApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundles_dir = conf.get("bundles_dir") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(app_dir))), "bundles")
        self.cache_dir = conf.get("cache_dir") or os.path.join(studies, ".samv2_cache")
        self.modality = conf.get("modality", "ct")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SAMv2",
            description="SAMv2 anatomical embeddings: one-shot point matching and CrossSAM CT-MR rigid registration",
            version="0.1.0",
        )

    def init_infers(self):
        resolve = self.datastore().get_image_uri
        return {
            "samv2_match": MatchPointsTask(resolve, self.bundles_dir, self.cache_dir, self.modality),
            "crosssam_register": RegisterTask(resolve, self.bundles_dir),
        }
