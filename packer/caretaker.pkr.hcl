# The machine image for one caretaker box: Amazon Linux 2023 on arm64 (Graviton) with PostgreSQL 16
# (+ PostGIS), Redis 7 (Valkey), caretaker and the Zmanim API baked in, every unit enabled and no
# instance-specific state left behind, so that every instance launched from it boots fresh:
# caretaker-firstboot.service finds the data volume, mounts it at /data and writes the secrets.
#
#   packer build -var caretaker_rpm=dist/caretaker-0.1.0-1.aarch64.rpm \
#     -var api_version=v1.4.2 -var releases_bucket=my-releases -var backup_bucket=my-backups \
#     -var alert_sender=caretaker@example.com packer/caretaker.pkr.hcl
#
# Packer 1.6 (Debian's) has the amazon-ebs builder built in and validates this template as it is.
# Newer Packer needs the plugin first: `packer plugins install github.com/hashicorp/amazon`.
# (A required_plugins block would say so, but Packer 1.6 rejects it.)
#
# Instances launched from the image must use IMDSv2 with a hop limit of 1 (launch template:
# http_tokens = required); caretaker never falls back to IMDSv1.

packer {
  required_version = ">= 1.6.6"
}

variable "region" {
  type        = string
  description = "AWS region to build in (the AMI lands there; copy it to others with ami_regions)."
  default     = "eu-west-1"
}

variable "ami_regions" {
  type        = list(string)
  description = "Further regions to copy the finished AMI to."
  default     = []
}

variable "instance_type" {
  type        = string
  description = "Build instance: Graviton (arm64), like the m7g.medium the image runs on."
  default     = "t4g.medium"
}

variable "subnet_id" {
  type        = string
  description = "Subnet for the build instance (empty: the default VPC). It needs a way to the AL2023 repositories and S3."
  default     = ""
}

variable "build_instance_profile" {
  type        = string
  description = "Instance profile of the build instance: it must be allowed s3:GetObject on the API release in releases_bucket."
  default     = ""
}

variable "image_name" {
  type        = string
  description = "Name prefix of the AMI; the build time is appended."
  default     = "caretaker-zmanim"
}

variable "root_volume_size" {
  type        = number
  description = "Root volume in GiB. Data lives on the separate EBS data volume, never here."
  default     = 16
}

variable "caretaker_version" {
  type        = string
  description = "caretaker's version, recorded in the AMI's tags."
  default     = "0.1.0"
}

variable "caretaker_rpm" {
  type        = string
  description = "Path on the build machine of the caretaker RPM (aarch64) to install."
}

variable "api_version" {
  type        = string
  description = "Release of the Zmanim API baked in: s3://RELEASES_BUCKET/zmanim-api/VERSION/zmanim-api."
}

variable "releases_bucket" {
  type        = string
  description = "S3 bucket holding the API's releases under zmanim-api/."
}

variable "backup_bucket" {
  type        = string
  description = "S3 bucket for backups (backup.bucket); empty leaves backups off."
  default     = ""
}

variable "alert_sender" {
  type        = string
  description = "Verified SES sender of alert emails (notify.sender); empty leaves email off."
  default     = ""
}

variable "alert_recipients" {
  type        = list(string)
  description = "Alert recipients (notify.recipients)."
  default     = []
}

variable "ssm_path" {
  type        = string
  description = "SSM parameter path read at boot (secrets.ssm-path)."
  default     = "/zmanim/prod/"
}

variable "postgres_packages" {
  type        = list(string)
  description = "PostgreSQL 16 packages from the AL2023 repositories."
  default     = ["postgresql16", "postgresql16-server", "postgresql16-contrib"]
}

variable "postgis_repo_url" {
  type        = string
  description = "baseurl of a dnf repository with PostGIS built for AL2023 aarch64 and PostgreSQL 16 (AL2023's own repositories have no PostGIS). Empty: no PostGIS, and the build fails unless postgis_optional is true."
  default     = ""
}

variable "postgis_package" {
  type        = string
  description = "PostGIS package name in that repository."
  default     = "postgis34_16"
}

variable "postgis_optional" {
  type        = bool
  description = "Build without PostGIS when postgis_repo_url is empty (then remove postgis from provision.extensions)."
  default     = false
}

variable "redis_package" {
  type        = string
  description = "The Redis 7 server. valkey (Redis 7.2 compatible) where the AL2023 release has it; redis6 (Redis 6.2) is the older fallback, with redis_unit = redis6.service, redis_user = redis6 and redis_conf = /etc/redis6/redis6.conf."
  default     = "valkey"
}

variable "redis_unit" {
  type    = string
  default = "valkey.service"
}

variable "redis_user" {
  type    = string
  default = "valkey"
}

variable "redis_conf" {
  type    = string
  default = "/etc/valkey/valkey.conf"
}

locals {
  build_time = formatdate("YYYYMMDD-hhmm", timestamp())
}

source "amazon-ebs" "al2023_arm64" {
  region                      = var.region
  ami_regions                 = var.ami_regions
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  iam_instance_profile        = var.build_instance_profile
  associate_public_ip_address = true
  ssh_username                = "ec2-user"
  ssh_interface               = "public_ip"

  ami_name        = "${var.image_name}-${var.caretaker_version}-${var.api_version}-${local.build_time}"
  ami_description = "caretaker ${var.caretaker_version}, Zmanim API ${var.api_version}, PostgreSQL 16, ${var.redis_package} on Amazon Linux 2023 arm64"
  ena_support     = true
  encrypt_boot    = true

  source_ami_filter {
    filters = {
      name                = "al2023-ami-2023.*-kernel-6.1-arm64"
      architecture        = "arm64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.root_volume_size
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    encrypted             = true
    delete_on_termination = true
  }

  tags = {
    Name              = "${var.image_name}-${local.build_time}"
    caretaker_version = var.caretaker_version
    api_version       = var.api_version
    base_ami          = "{{ .SourceAMI }}"
    base_ami_name     = "{{ .SourceAMIName }}"
  }

  run_tags = {
    Name = "packer-${var.image_name}"
  }
}

build {
  sources = ["source.amazon-ebs.al2023_arm64"]

  # cloud-init is still writing on the first boot of the build instance.
  provisioner "shell" {
    inline = ["cloud-init status --wait >/dev/null || true"]
  }

  provisioner "shell" {
    execute_command = "sudo -E bash -euo pipefail '{{ .Path }}'"
    script          = "${path.root}/scripts/10-packages.sh"
    environment_vars = [
      "POSTGRES_PACKAGES=${join(" ", var.postgres_packages)}",
      "POSTGIS_REPO_URL=${var.postgis_repo_url}",
      "POSTGIS_PACKAGE=${var.postgis_package}",
      "POSTGIS_OPTIONAL=${var.postgis_optional}",
      "REDIS_PACKAGE=${var.redis_package}",
    ]
  }

  provisioner "file" {
    source      = var.caretaker_rpm
    destination = "/tmp/caretaker.rpm"
  }

  provisioner "shell" {
    execute_command = "sudo -E bash -euo pipefail '{{ .Path }}'"
    script          = "${path.root}/scripts/20-caretaker.sh"
    environment_vars = [
      "AWS_REGION=${var.region}",
      "API_VERSION=${var.api_version}",
      "RELEASES_BUCKET=${var.releases_bucket}",
      "BACKUP_BUCKET=${var.backup_bucket}",
      "ALERT_SENDER=${var.alert_sender}",
      "ALERT_RECIPIENTS=${join(" ", var.alert_recipients)}",
      "SSM_PATH=${var.ssm_path}",
      "POSTGIS_PRESENT=${var.postgis_repo_url != "" ? "yes" : "no"}",
      "REDIS_UNIT=${var.redis_unit}",
      "REDIS_USER=${var.redis_user}",
      "REDIS_CONF=${var.redis_conf}",
    ]
  }

  # Last: nothing of this build instance may reach the instances made from the image.
  provisioner "shell" {
    execute_command = "sudo -E bash -euo pipefail '{{ .Path }}'"
    script          = "${path.root}/scripts/90-clean.sh"
  }
}
