"""Transfer of pretrained backbones to Detectron2 object detection."""
