"""SSD300 (VGG16-BN) on Pascal VOC: model, VOC reader, box coding, MultiBox loss, mAP@0.5."""
