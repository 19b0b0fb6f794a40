// The generated cloudburst.v1 messages and services, for anything the thin layer does not cover.
export * from "./gen/cloudburst/v1/diagnostics_service_pb.js";
export * from "./gen/cloudburst/v1/error_pb.js";
export * from "./gen/cloudburst/v1/execution_pb.js";
export * from "./gen/cloudburst/v1/executor_service_pb.js";
export * from "./gen/cloudburst/v1/function_pb.js";
export * from "./gen/cloudburst/v1/kvs_service_pb.js";
export * from "./gen/cloudburst/v1/lattice_pb.js";
export * from "./gen/cloudburst/v1/messaging_service_pb.js";
export * from "./gen/cloudburst/v1/scheduler_service_pb.js";
export * from "./gen/cloudburst/v1/value_pb.js";
