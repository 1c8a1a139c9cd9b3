//! The gRPC API (`proto/ddpm/v1/worker.proto`, package `ddpm.v1`), the one boundary of the service:
//! generated types and the descriptor set for reflection ([`pb`]), request checks and conversions
//! ([`convert`]), the handlers ([`handlers`]) and the mapping of every error to a status ([`error`]).

pub mod auth;
pub mod convert;
pub mod error;
pub mod handlers;

#[cfg(test)]
mod fuzz;

/// Generated messages, the `WorkerService` server trait and client.
pub mod pb {
    tonic::include_proto!("ddpm.v1");
}

/// The encoded `FileDescriptorSet` of `ddpm.v1`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ddpm_v1_descriptor");

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_describes_the_worker_service() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let file = set.file.iter().find(|f| f.package() == "ddpm.v1").expect("ddpm.v1 is in the set");
        let service = file.service.iter().find(|s| s.name() == "WorkerService").expect("WorkerService");
        let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        assert_eq!(
            methods,
            [
                "SubmitJob",
                "GetJob",
                "ListJobs",
                "CancelJob",
                "RetryJob",
                "WatchJob",
                "ListModels",
                "GetModel",
                "DeleteJob"
            ]
        );
        assert!(service.method.iter().find(|m| m.name() == "WatchJob").unwrap().server_streaming());
    }
}
