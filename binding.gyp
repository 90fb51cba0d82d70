{
  "targets": [
    {
      "target_name": "seek_hole",
      "sources": ["native/seek_hole.c", "native/sendfile.c", "native/digests.c"]
    }
  ]
}
