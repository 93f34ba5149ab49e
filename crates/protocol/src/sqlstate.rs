//! SQLSTATE codes pgsplit emits itself. Codes are constants, never literals
//! at the call site; the server maps its errors to these in one place.

pub const SUCCESSFUL_COMPLETION: &str = "00000";
pub const WARNING: &str = "01000";
pub const SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION: &str = "08001";
pub const CONNECTION_FAILURE: &str = "08006";
pub const TRANSACTION_RESOLUTION_UNKNOWN: &str = "08007";
pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_CATALOG_NAME: &str = "3D000";
pub const READ_ONLY_SQL_TRANSACTION: &str = "25006";
pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
pub const INVALID_CURSOR_NAME: &str = "34000";
pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const QUERY_CANCELED: &str = "57014";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CRASH_SHUTDOWN: &str = "57P02";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const INTERNAL_ERROR: &str = "XX000";
pub const UNDEFINED_OBJECT: &str = "42704";
pub const SYNTAX_ERROR: &str = "42601";
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
pub const INVALID_PARAMETER_VALUE: &str = "22023";
pub const CANT_CHANGE_RUNTIME_PARAM: &str = "55P02";
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";

/// `config_file_error`: a reload found a configuration that does not load.
pub const CONFIG_FILE_ERROR: &str = "F0000";
