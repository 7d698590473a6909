"""Generated protobuf, grpcio and purerpc code for the jobd.v1 API: `just proto` rewrites it."""
